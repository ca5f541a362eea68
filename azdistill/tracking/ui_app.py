"""The MLflow server app `azdistill ui` serves: MLflow's own, opening in its model-training views.

MLflow 3's web UI keeps the choice between its "GenAI" and "Model training" views in the browser
(`localStorage["mlflow.workflowType_v1"]`, GenAI when unset), so the bare address and a click on an experiment open
trace and judge pages with nothing in them for a distillation. The server cannot set it through MLflow; this app
adds one line of script to the UI's page (index.html) that sets the model-training view, and shuts the assistant
panel that covers a third of the page, only where the browser holds no choice of its own: a reviewer who switches
to GenAI keeps it.

It is registered as an MLflow server app (the `mlflow.app` entry point `azdistill` in pyproject.toml, as MLflow's
own `basic-auth` is), so `mlflow ui --app-name azdistill` runs MLflow's server unchanged apart from that line.
"""

from __future__ import annotations

import json

# localStorage keys of MLflow's UI (its useLocalStorage hook stores `<key>_v<version>` as JSON) and the values set
# when the browser has none.
DEFAULTS = {
    "mlflow.workflowType_v1": "machine_learning",
    "mlflow.assistant.panelOpen_v1": False,
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,
}
SCRIPT = (
    "<script>try{"
    + "".join(f"if(localStorage.getItem({json.dumps(key)})===null)localStorage.setItem({json.dumps(key)},"
              f"{json.dumps(json.dumps(value))});" for key, value in DEFAULTS.items())
    + "}catch(e){}</script>"
).encode()


def with_defaults(html: bytes) -> bytes:
    """The UI's page with the defaults script first in its <head> (before MLflow's own scripts read the keys)."""
    marker = b"<head>"
    at = html.find(marker)
    return html if at < 0 else html[:at + len(marker)] + SCRIPT + html[at + len(marker):]


def _add_defaults(response):
    """Flask after-request hook: the UI's page gets the script; every other response passes unchanged."""
    if response.status_code != 200 or response.mimetype != "text/html":
        return response
    response.direct_passthrough = False  # a file sent from disk: read it to change it
    response.set_data(with_defaults(response.get_data()))
    response.headers.pop("ETag", None)  # the page differs from the file on disk
    return response


def create_app():
    """MLflow's server app (FastAPI under uvicorn, MLflow's default server; Flask under gunicorn or waitress) with
    the defaults script added to its page."""
    from mlflow.environment_variables import _MLFLOW_SGI_NAME
    from mlflow.server import app as flask_app

    if _add_defaults not in flask_app.after_request_funcs.get(None, []):
        flask_app.after_request(_add_defaults)
    if _MLFLOW_SGI_NAME.get() == "uvicorn":  # the server MLflow runs, told to the app as MLflow's basic-auth app is
        from mlflow.server.fastapi_app import create_fastapi_app

        return create_fastapi_app(flask_app)
    return flask_app
