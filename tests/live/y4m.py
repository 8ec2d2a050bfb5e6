"""Write a .y4m clip (Chromium's fake-webcam input) from a video file, with PyAV."""
from __future__ import annotations

import sys

import av


def write_y4m(src: str, dst: str, size=(640, 480), max_frames: int = 150) -> int:
    n = 0
    with av.open(src) as inp, av.open(dst, "w", format="yuv4mpegpipe") as out:
        stream = out.add_stream("rawvideo", rate=30)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for frame in inp.decode(video=0):
            f = frame.reformat(width=size[0], height=size[1], format="yuv420p")
            f.pts = None
            for packet in stream.encode(f):
                out.mux(packet)
            n += 1
            if n >= max_frames:
                break
        for packet in stream.encode():
            out.mux(packet)
    return n


if __name__ == "__main__":
    print(write_y4m(sys.argv[1], sys.argv[2]))
