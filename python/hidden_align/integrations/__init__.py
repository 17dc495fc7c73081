"""Drop-in integrations for verl, OpenRLHF and TRL."""
