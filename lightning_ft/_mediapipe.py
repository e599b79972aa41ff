"""mediapipe plumbing: the import with its C++ logging (absl/glog/TFLite)
turned down (its per-graph INFO and feedback-tensor warnings would bury
the tracker's own one-line messages in every batch log), and a solution's
graph called without ``SolutionBase.process``."""

from __future__ import annotations

import os
from typing import List, Optional

import numpy as np


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


class DirectGraph:
    """A mediapipe solution's graph fed one RGB image and read back as the
    serialized protos of one output stream, not through
    ``SolutionBase.process``: that builds a new namedtuple class on every
    call and parses the output into Python protos (FaceMesh on carphone's
    512 px crops 5.31 -> 4.87 ms a frame, BlazeFace 2.51 -> 2.29 ms a call,
    the same results). It uses mediapipe 0.10.21's SolutionBase internals
    (the pinned version); `make` returns None where they differ, and the
    caller uses ``process``."""

    def __init__(self, solution, stream: str, output: str, make_packet, image_format, serialized_list):
        self._solution = solution
        self._stream = stream
        self._output = output
        self._make_packet = make_packet
        self._image_format = image_format
        self._serialized_list = serialized_list

    @classmethod
    def make(cls, solution, output: str) -> Optional["DirectGraph"]:
        """For `solution` (a SolutionBase with one image input) and its
        proto-list output stream `output`; None where its internals differ."""
        try:
            from mediapipe.python import packet_creator
            from mediapipe.python._framework_bindings import _packet_getter, image_frame
            from mediapipe.python.solution_base import PacketDataType

            (stream, kind), = solution._input_stream_type_info.items()
            make_packet = {PacketDataType.IMAGE: packet_creator.create_image,
                           PacketDataType.IMAGE_FRAME: packet_creator.create_image_frame}[kind]
            if not (isinstance(solution._graph_outputs, dict) and solution._graph is not None
                    and isinstance(solution._simulated_timestamp, int)
                    and solution._output_stream_type_info[output] == PacketDataType.PROTO_LIST):
                return None
            return cls(solution, stream, output, make_packet, image_frame.ImageFormat.SRGB,
                       _packet_getter._get_serialized_proto_list)
        except (AttributeError, ImportError, KeyError, TypeError, ValueError):
            return None

    def __call__(self, image: np.ndarray) -> List[bytes]:
        """RGB uint8 [H,W,3] -> the output stream's protos, serialized
        (empty where the graph gave none)."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB image [H,W,3], got shape {image.shape}")
        solution = self._solution
        solution._graph_outputs.clear()
        solution._simulated_timestamp += 33333  # as process() does: 30 fps
        packet = self._make_packet(image, image_format=self._image_format)
        solution._graph.add_packet_to_input_stream(stream=self._stream,
                                                   packet=packet.at(solution._simulated_timestamp))
        solution._graph.wait_until_idle()
        output = solution._graph_outputs.get(self._output)
        if output is None or output.is_empty():
            return []
        return list(self._serialized_list(output))
