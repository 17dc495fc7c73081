#!/usr/bin/env bash
# Makes DIR a virtual environment layered over the environment that `python` runs in (the
# system interpreter, a venv or a conda env): DIR sees every package of that environment, and
# what is installed into DIR itself comes first. scripts/test.sh uses it to run the tests with
# another torch than the active environment's.
#
# `python -m venv --system-site-packages` is not enough: inside a venv it inherits the BASE
# interpreter's site-packages, not the active venv's. Instead DIR gets a .pth file whose line
# calls site.addsitedir() on each site-packages folder of the active environment. addsitedir,
# unlike a plain path line, also runs the .pth files it finds there, which is what makes an
# editable install (a .pth pointing at the source tree) importable from DIR. Folders added by a
# .pth file come after DIR's own site-packages, so DIR's packages shadow the active ones.
#
# Idempotent: an existing DIR is kept when it was made from the same base interpreter and
# without --system-site-packages (its .pth file is rewritten), and made afresh otherwise.
#
# Usage: bash scripts/overlay_venv.sh DIR [--without-pip]
#   PYTHON=/path/to/python picks the active interpreter (default: `python` on PATH).
#   --without-pip: no pip of DIR's own (`DIR/bin/python -m pip` then runs the active
#   environment's pip, which installs into DIR).
set -euo pipefail

dir=${1:?usage: overlay_venv.sh DIR [--without-pip]}
venv_args=()
case "${2:-}" in
"") ;;
--without-pip) venv_args+=(--without-pip) ;;
*) echo "overlay_venv.sh: unknown option $2" >&2; exit 2 ;;
esac
py=${PYTHON:-python}

# An interpreter of another version or base install cannot load the active environment's
# compiled modules; a DIR made with --system-site-packages also sees the base interpreter's
# packages, which the active environment may not. Either way DIR is made afresh.
identity='import sys; print(sys.version, sys.base_prefix)'
want=$("$py" -c "$identity")
if [ -e "$dir" ]; then
    if [ ! -f "$dir/pyvenv.cfg" ]; then
        echo "overlay_venv.sh: $dir exists and is not a virtual environment" >&2
        exit 1
    fi
    have=$("$dir/bin/python" -c "$identity" 2>/dev/null || true)
    if [ "$have" != "$want" ] ||
        grep -qiE '^include-system-site-packages *= *true' "$dir/pyvenv.cfg" 2>/dev/null; then
        rm -rf "$dir"
    fi
fi
if [ ! -e "$dir" ]; then
    "$py" -m venv ${venv_args[@]+"${venv_args[@]}"} "$dir"
fi

# The active environment's site folders, in the order its own sys.path has them: the user site
# when it is enabled, site.getsitepackages() (which also lists the base interpreter's folders
# for a venv made with system site packages, and Debian's dist-packages), then sysconfig's
# purelib and platlib in case a custom scheme puts them elsewhere.
site_dir=$("$dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$py" - "$site_dir/_active_environment.pth" <<'EOF'
import os
import site
import sys
import sysconfig

dirs = []
if site.ENABLE_USER_SITE:
    dirs.append(site.getusersitepackages())
dirs += site.getsitepackages()
dirs += [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
seen = []
for d in dirs:
    d = os.path.realpath(d)
    if os.path.isdir(d) and d not in seen:
        seen.append(d)
# One line: a .pth line that starts with `import` is executed; ascii() keeps the file ASCII
# whatever the locale that reads it.
calls = "; ".join(f"site.addsitedir({ascii(d)})" for d in seen)
with open(sys.argv[1], "w", encoding="ascii") as f:
    f.write(f"import site; {calls}\n")
EOF
