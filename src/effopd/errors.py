"""The error types that mean "the input was wrong" (reported as one line, exit code 2), as
opposed to bugs (reported with a traceback)."""

from effopd.checkpoint import CheckpointError
from effopd.config import ConfigError
from effopd.data.loaders import DatasetError
from effopd.models import ModelLoadError
from effopd.module_groups import UnknownParameterError
from effopd.report.cli import ReportError
from effopd.train import RunDirError

USER_ERRORS = (ConfigError, DatasetError, ModelLoadError, RunDirError, CheckpointError, UnknownParameterError, ReportError)
