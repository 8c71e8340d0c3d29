#!/usr/bin/env python
"""The seed's inference script: ``python run_inference.py --model_path M --image_path x.jpg`` (see --help)."""

import sys

from pneumoscan.cli import predict_main as main

if __name__ == "__main__":
    sys.exit(main())
