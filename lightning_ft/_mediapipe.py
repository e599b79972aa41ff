"""Import mediapipe with its C++ logging (absl/glog/TFLite) turned down: its
per-graph INFO and feedback-tensor warnings would bury the tracker's own
one-line messages in every batch log."""

import os


def import_mediapipe():
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import mediapipe as mp

    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    return mp
