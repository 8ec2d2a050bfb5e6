"""Checks on a client's SDP offer before aiortc sees it, so a bad offer gets a message that says what is
wrong (no video, a codec this server cannot decode, not SDP at all) instead of a stack trace."""
from __future__ import annotations

from dataclasses import dataclass

from aiortc.sdp import SessionDescription

DECODABLE = ("VP8", "H264")  # the video codecs aiortc decodes (through PyAV)
MAX_SDP_BYTES = 64 * 1024


class SdpError(ValueError):
    pass


@dataclass
class OfferInfo:
    video_codecs: list[str]
    wants_video_back: bool  # the client's video m-line can receive (sendrecv / recvonly)
    has_data_channel: bool


def check_offer(sdp: str) -> OfferInfo:
    if len(sdp) > MAX_SDP_BYTES:
        raise SdpError(f"the SDP offer is {len(sdp)} bytes; at most {MAX_SDP_BYTES} are accepted")
    if not sdp.lstrip().startswith("v=0"):
        raise SdpError("the offer is not SDP (it must start with 'v=0')")
    try:
        desc = SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc's parser raises assorted errors on malformed lines
        raise SdpError(f"the SDP offer could not be parsed: {exc.__class__.__name__}: {exc}") from None
    video = [m for m in desc.media if m.kind == "video" and m.port != 0]
    if not video:
        raise SdpError("the offer has no video: add the camera track before creating the offer")
    m = video[0]
    if m.direction not in ("sendrecv", "sendonly"):
        raise SdpError(f"the offer's video is '{m.direction}': the client must send its camera (sendrecv or sendonly)")
    codecs = [c.mimeType.split("/", 1)[1] for c in m.rtp.codecs]
    usable = [c for c in codecs if c.upper() in DECODABLE]
    if not usable:
        offered = ", ".join(sorted(set(codecs))) or "none"
        raise SdpError(f"no video codec in common: the offer has {offered}; this server decodes "
                       f"{' and '.join(DECODABLE)}")
    return OfferInfo(codecs, m.direction == "sendrecv", any(x.kind == "application" for x in desc.media))
