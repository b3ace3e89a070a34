"""Sample tables through each logger's own API (TensorBoard, W&B, MLflow without their packages: fake clients)."""

import csv

from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from lightning_rl.callbacks.logger_tables import cell_text, log_table, markdown_table

ROWS = [{"prompt": [{"role": "user", "content": "2 | 3?"}], "completion": "5\nok", "reward": 1.0, "label": True},
        {"prompt": "hi", "completion": "", "reward": float("nan"), "label": False}]


class Calls:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


class FakeTensorBoard(TensorBoardLogger):
    def __init__(self):  # no tensorboard needed: the writer is a recorder
        self.writer = Calls()

    @property
    def experiment(self):
        return self.writer


class FakeWandb(WandbLogger):
    def __init__(self):  # WandbLogger.log_table builds the wandb.Table; record what it is given
        self.tables = []

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
        self.tables.append((key, columns, data, step))


class FakeMLflow(MLFlowLogger):
    def __init__(self):
        self.client = Calls()

    @property
    def experiment(self):
        return self.client

    @property
    def run_id(self):
        return "run-1"


def test_csv_logger_appends_next_to_metrics(tmp_path):
    logger = CSVLogger(tmp_path)
    where = log_table(logger, "completions", ROWS, step=3)
    log_table(logger, "completions", ROWS[:1], step=5)
    assert where == str(tmp_path / "lightning_logs" / "version_0" / "completions.csv")
    with open(where) as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["step", "prompt", "completion", "reward", "label"]
    assert rows[1] == ["3", "user: 2 | 3?", "5\nok", "1.0", "True"] and [r[0] for r in rows[1:]] == ["3", "3", "5"]


def test_tensorboard_gets_a_markdown_text_table():
    logger = FakeTensorBoard()
    assert log_table(logger, "completions", ROWS, step=7) == "TensorBoard text 'completions'"
    ((name, args, kwargs),) = logger.writer.calls
    assert name == "add_text" and args[0] == "completions" and kwargs == {"global_step": 7}
    assert args[1] == markdown_table(ROWS)
    assert "| user: 2 \\| 3? | 5<br>ok | 1 | True |" in args[1] and "| hi |  | nan | False |" in args[1]


def test_wandb_gets_a_table_with_numbers_kept():
    logger = FakeWandb()
    log_table(logger, "completions", ROWS, step=2)
    ((key, columns, data, step),) = logger.tables
    assert (key, columns, step) == ("completions", ["prompt", "completion", "reward", "label"], 2)
    assert data[0] == ["user: 2 | 3?", "5\nok", 1.0, True]


def test_mlflow_gets_a_table_artifact_per_step():
    logger = FakeMLflow()
    assert log_table(logger, "completions", ROWS, step=12) == "MLflow artifact completions/step_000012.json"
    ((name, args, kwargs),) = logger.client.calls
    assert name == "log_table" and args == ("run-1",)
    assert kwargs["artifact_file"] == "completions/step_000012.json"
    assert kwargs["data"]["prompt"] == ["user: 2 | 3?", "hi"] and kwargs["data"]["label"] == [True, False]


def test_other_loggers_and_cells():
    class Other(Logger):
        name = version = None

        def log_metrics(self, metrics, step=None):
            pass

        def log_hyperparams(self, params):
            pass

    assert log_table(Other(), "completions", ROWS, step=1) is None
    assert cell_text("x" * 10, max_chars=6) == "xxx..." and cell_text(0.123456) == "0.1235"
