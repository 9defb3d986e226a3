"""Prefect flows over the DVC stages: reproduce-table2 (table2.py) and ablation (ablation.py), whose tasks run DVC
stages (tasks.py, stages.py) in the checkout or a derived workspace (workspace.py) at smoke or paper scale
(scale.py); deployments in deploy.py."""
