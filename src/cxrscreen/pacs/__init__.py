"""Hospital integration: read chest X-ray studies from a PACS over DICOMweb and store the results back.

`client.PacsClient` (QIDO-RS / WADO-RS / STOW-RS through dicomweb-client), `run.StudyScreener` (one study:
query, fetch the original instances, predict, store SR + SC, idempotent), `watch.OrthancWatcher` (Orthanc's
/changes feed of stable studies, with a state file).
"""
