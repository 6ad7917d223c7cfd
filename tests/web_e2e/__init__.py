"""Helpers for the browser test of ``rsna-cspine serve``: a server thread and a headless Chromium."""
