"""Publish HTML reports to the artifacts bucket and link them from the task in the Airflow UI."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator, BaseOperatorLink
from airflow.sdk.exceptions import AirflowSkipException
from airflow.sdk.execution_time.xcom import XCom

from dtp.connections import AWS_CONN_ID
from dtp.metrics.report import render_validation_report
from dtp.operators.masking import ExtraEnvMaskingMixin
from dtp.pipeline.results import export_metrics, publish_html, publish_report

REPORT_URL_KEY = "report_url"


class _ReportLink(BaseOperatorLink):
    """A button that opens the presigned URL the report task pushed."""

    def get_link(self, operator: BaseOperator, *, ti_key: Any) -> str:
        return XCom.get_value(ti_key=ti_key, key=REPORT_URL_KEY) or ""


class TrainingReportLink(_ReportLink):
    """The "Training report" button on the training report task."""

    name = "Training report"


class ValidationReportLink(_ReportLink):
    """The "Validation report" button on validate_cluster's report task."""

    name = "Validation report"


class TrainingReportOperator(ExtraEnvMaskingMixin, BaseOperator):
    """
    Render the report (plots, gates, params, resources), upload it to the artifacts bucket and push the run's
    metrics to the Prometheus Pushgateway where one is configured; skipped when training collected no metrics.

    :param spec: the run spec from ``validate_params``
    :param metrics: the summary from ``collect_metrics``
    :param preflight: the preflight gate's result, if preflight ran
    :param run_resources: ids of what the run created, shown in the report
    :param checkpoint: where ``save_checkpoint`` saved the run's newest checkpoint, if it did
    """

    template_fields: Sequence[str] = ("spec", "metrics", "preflight", "run_resources", "checkpoint")
    operator_extra_links = (TrainingReportLink(),)

    def __init__(
        self,
        *,
        spec: Any,
        metrics: Any,
        preflight: Any = None,
        run_resources: Any = None,
        checkpoint: Any = None,
        aws_conn_id: str = AWS_CONN_ID,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.metrics = metrics
        self.preflight = preflight
        self.run_resources = run_resources
        self.checkpoint = checkpoint
        self.aws_conn_id = aws_conn_id

    def execute(self, context: Any) -> dict[str, str]:
        if not self.metrics:
            raise AirflowSkipException("no metrics were collected (training did not finish): no report")
        resources = dict(self.run_resources or {})
        if (self.checkpoint or {}).get("saved"):
            resources["checkpoint"] = self.checkpoint["uri"]
        report = publish_report(self.spec, self.metrics, self.preflight, resources, self.aws_conn_id)
        context["ti"].xcom_push(key=REPORT_URL_KEY, value=report["url"])
        export_metrics(self.spec, self.metrics, self.preflight)
        return report


class ClusterValidationReportOperator(ExtraEnvMaskingMixin, BaseOperator):
    """
    Render validate_cluster's report (verdict, busbw plot, versions per node), upload it and push its figures to
    the Prometheus Pushgateway where one is configured.

    :param spec: the validation spec from ``validate_params``
    :param result: the judged preflight result (with its ``failures``)
    """

    template_fields: Sequence[str] = ("spec", "result")
    operator_extra_links = (ValidationReportLink(),)

    def __init__(self, *, spec: Any, result: Any, aws_conn_id: str = AWS_CONN_ID, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.result = result
        self.aws_conn_id = aws_conn_id

    def execute(self, context: Any) -> dict[str, str]:
        html = render_validation_report(self.spec, self.result)
        report = publish_html(f"validation/{self.spec['names']['run_key']}/report.html", html, self.aws_conn_id)
        context["ti"].xcom_push(key=REPORT_URL_KEY, value=report["url"])
        export_metrics(self.spec, {}, self.result)
        return report
