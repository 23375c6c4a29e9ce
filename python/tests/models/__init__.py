"""Test models for the Recorder and tracing tests (written the way their authors write them)."""
