"""A Serve deployment's `user_config`, read and changed in place on a running application.

Serve calls `reconfigure(user_config)` on every running replica of a deployment whose user_config
changed, and on every replica it starts later (before that replica takes traffic), without
restarting any: `DeploymentVersion.requires_actor_restart` (ray/serve/_private/version.py) compares
only the code version, `ray_actor_options` and placement options, and `deploy.pin_versions` fixes
the code version of every deployment of a hetforge application.

Serve 2.60 has no public call that changes one deployment of an application deployed with
`serve.run`: its declarative API (`serve deploy`) applies only to applications deployed from a
config file. So this module does what `serve.run` does, on the application as Serve's controller
holds it: it reads every deployment's info (`list_deployments_internal`), replaces the user_config
of one, and submits the same application again (`deploy_applications`). Deployments whose info is
unchanged are left alone (`DeploymentState.deploy` returns early); an autoscaled one keeps its
current replica count (`register_deployment` is given the current target).

Read-modify-write: two processes changing deployments of one application at the same moment could
undo each other's change, so callers serialize (`swap_control.publish` holds a store lock).

Only this module touches Serve's internals; it needs a connection to the Ray cluster (a replica
has one; a driver calls `ray.init(address=...)` first).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import ray
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
from ray.serve.generated.serve_pb2 import ApplicationArgs, DeploymentArgs

CONTROLLER_TIMEOUT_S = 30.0


class ConfigPushError(RuntimeError):
    """The user_config could not be read or set: not connected to Ray, Serve's controller did not answer, or no such
    application or deployment."""


def _controller():
    if not ray.is_initialized():
        raise ConfigPushError("not connected to a Ray cluster: Serve's deployments cannot be reached from here")
    try:
        return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError as err:
        raise ConfigPushError(f"Ray Serve is not running on this cluster ({err})") from None


def _infos(app: str) -> dict[str, Any]:
    """Deployment name -> Serve's `DeploymentInfo`, for the deployments of application `app`."""
    try:
        found = ray.get(_controller().list_deployments_internal.remote(), timeout=CONTROLLER_TIMEOUT_S)
    except ConfigPushError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to reach the controller is one error for the caller
        raise ConfigPushError(f"Serve's controller did not answer: {type(err).__name__}: {err}"[:500]) from None
    out = {ident.name: info for ident, (info, _route) in found.items() if ident.app_name == app}
    if not out:
        raise ConfigPushError(f"no application {app!r} on Ray Serve")
    return out


def user_configs(app: str) -> dict[str, Any]:
    """Deployment name -> its user_config (None where unset), for the deployments of `app`."""
    return {name: info.deployment_config.user_config for name, info in _infos(app).items()}


def update_user_config(app: str, deployment: str, change: Callable[[dict], dict]) -> dict:
    """Set deployment `deployment` of `app` to `change(current user_config)` and return the new one.

    Returns once Serve's controller has taken the new target; the replicas are reconfigured by its
    control loop right after (the caller waits for their reports). Nothing is submitted when the
    config is unchanged.
    """
    infos = _infos(app)
    if deployment not in infos:
        raise ConfigPushError(
            f"application {app!r} has no deployment {deployment!r} (it has {', '.join(sorted(infos))})"
        )
    current = infos[deployment].deployment_config.user_config
    new = change(copy.deepcopy(current) if isinstance(current, dict) else {})
    if new == current:
        return new
    args = []
    for name, info in infos.items():
        config = info.deployment_config.model_copy(deep=True)
        if name == deployment:
            config.user_config = new
            config.user_configured_option_names = set(config.user_configured_option_names) | {"user_config"}
        config.version = info.version  # as `get_deploy_args` sets it: the same version, so no replica restarts
        proto = DeploymentArgs(
            deployment_name=name,
            deployment_config=config.to_proto_bytes(),
            replica_config=info.replica_config.to_proto_bytes(),
            deployer_job_id=info.deployer_job_id,
            ingress=info.ingress,
            ingress_request_router=info.ingress_request_router,
        )
        if info.ingress and info.route_prefix:
            proto.route_prefix = info.route_prefix
        args.append(proto.SerializeToString())
    try:
        ray.get(
            _controller().deploy_applications.remote(
                {app: args}, {app: ApplicationArgs(external_scaler_enabled=False).SerializeToString()}
            ),
            timeout=CONTROLLER_TIMEOUT_S,
        )
    except Exception as err:  # noqa: BLE001 - the submission failed: the caller reports it, nothing was changed
        raise ConfigPushError(f"Serve's controller refused the new config: {type(err).__name__}: {err}"[:500]) from None
    return new
