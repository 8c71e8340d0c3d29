#!/usr/bin/env python
"""The seed's training script: ``python train_medical_model.py --data_dir DIR ...`` (see --help)."""

import sys

from pneumoscan.cli import train_main as main

if __name__ == "__main__":
    sys.exit(main())
