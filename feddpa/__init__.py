"""feddpa: federated fine-tuning with FedDPA dual adapters (arXiv 2403.19211) on Ray, served over HTTP."""

__version__ = "0.1.0"
