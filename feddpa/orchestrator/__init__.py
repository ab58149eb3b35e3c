"""The round loop, executors (in-process and Ray), the driver, reports."""
