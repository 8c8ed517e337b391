"""The evaluation report: ``report.html`` (self-contained) and its matplotlib figures."""
