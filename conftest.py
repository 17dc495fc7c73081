"""Collection rules for the whole repository (pytest's doctest run imports every module of
python/hidden_align)."""

import importlib.util

# An integration module imports its framework when it is imported (for verl that import is what
# registers the policy loss and the engine hooks), so without the framework it cannot even be
# collected; its tests in tests/ skip with the install command as the reason instead.
collect_ignore_glob = []
if importlib.util.find_spec("verl") is None:
    collect_ignore_glob.append("python/hidden_align/integrations/verl*.py")
