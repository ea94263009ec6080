"""PerVL benchmark harness: datasets, methods, metrics and the runner behind `polar bench pervl`."""
