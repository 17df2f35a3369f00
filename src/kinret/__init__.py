"""kinret: a competition kit for RFIW Track 3, search and retrieval of family members."""

__version__ = "0.1.0"
