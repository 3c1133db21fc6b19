"""The registered pyfunc's model code (MLflow "models from code"): loading a model version runs this file, which
names `SketchGANModel`, instead of unpickling a Python object. The version carries its own copy of the `pipeline`
package (``code_paths``), so loading it needs the pip requirements logged with it, not this project installed."""

import mlflow.models

from pipeline.registry.pyfunc_model import SketchGANModel

mlflow.models.set_model(SketchGANModel())
