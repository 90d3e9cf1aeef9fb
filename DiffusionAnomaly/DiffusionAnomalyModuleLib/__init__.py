"""Slicer-side helpers of the DiffusionAnomaly module (the Qt-free logic); no algorithms here."""
