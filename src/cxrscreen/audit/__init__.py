"""The shortcut audit: does the model read the lungs or the hospital? (`audit.run.run_audit`)"""
