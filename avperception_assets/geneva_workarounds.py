"""Ray's `worker_process_setup_hook`, under the name Ray clusters are configured with
(`avperception_assets.geneva_workarounds.setup_ray_worker`); the patches live in `patches`."""

from avperception_assets.patches import setup_ray_worker

__all__ = ["setup_ray_worker"]
