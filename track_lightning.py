#!/usr/bin/env python
"""python track_lightning.py -d 0 --data video.mp4 -v   (see README)"""
import sys

from lightning_ft.cli import track_main

if __name__ == "__main__":
    sys.exit(track_main())
