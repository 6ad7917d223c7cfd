"""The rsna_cspine test suite.

A package, so that its helper modules import as ``tests.<module>`` (``tests.dicom_factory``,
``tests.toy_pipeline``, ``python -m tests.failure_matrix``) without changing ``sys.path``; shared fixtures
live in ``tests/conftest.py``.
"""
