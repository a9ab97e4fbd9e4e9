"""Prediction results and the writers that put them somewhere: text, CSV, JSON Lines and DICOM (SR + SC).

`result.PredictionResult` is the one typed result; `writers.ResultSink` the one writer protocol (open,
write a batch, close) that the CLI, batch screening, the server and the PACS command use.
"""
