"""Prefect flows over the DVC stages. Lands with the orchestration issue."""
