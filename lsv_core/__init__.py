"""lsv_core: speaker-verification data, models, metrics, quantization and export.

EER is in percent (0-100) everywhere in this project.
"""

__version__ = "0.1.0"
