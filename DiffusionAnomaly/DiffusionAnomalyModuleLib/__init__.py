"""The Slicer module's Lib: one job per file (logic.py composes them). Qt-free; no algorithms here."""
