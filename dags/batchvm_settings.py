"""Where the example DAGs run. The defaults are the embedded local stack; set these for a real project."""

import os

ZONE = os.environ.get("BATCHVM_ZONE", "us-central1-a")
INSTANCE_TEMPLATE = os.environ.get("BATCHVM_INSTANCE_TEMPLATE", "batchvm-local")
IMAGE_REGISTRY = os.environ.get("BATCHVM_IMAGE_REGISTRY", "localhost")
SLEEP_TEST_IMAGE = f"{IMAGE_REGISTRY}/sleep_test:latest"
