"""Video ingestion: probe -> windows/frame selection -> decode (PyAV CPU or DALI) -> preprocess -> encoders.

Every backend decodes the frame indices chosen by `windows.plan_windows` from the index built by
`probe.probe_video`, so PyAV, DALI-CPU and DALI-GPU embed the same frames of the same video.
"""
