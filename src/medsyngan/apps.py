"""MedSynGAN's Flower apps, for `flwr run` and the Deployment Engine (``[tool.flwr.app.components]`` in
pyproject.toml names them), and for the local simulation that ``medsyngan train`` starts.

A composition root like the CLI: it builds the apps through the federated layer's factories and gives them what
lives above that layer, the run set-up from Flower's run config and the metrics hospitals report.
"""

from medsyngan.federated.client_app import make_client_app
from medsyngan.federated.server_app import make_server_app
from medsyngan.workflows.federation import hospital_metrics, server_setup

server_app = make_server_app(server_setup)
client_app = make_client_app(hospital_metrics)
