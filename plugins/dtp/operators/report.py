"""Publish a run's HTML report and link it from the task in the Airflow UI."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator, BaseOperatorLink
from airflow.sdk.exceptions import AirflowSkipException
from airflow.sdk.execution_time.xcom import XCom

from dtp.pipeline.results import publish_report

REPORT_URL_KEY = "report_url"


class TrainingReportLink(BaseOperatorLink):
    """The "Training report" button on the report task."""

    name = "Training report"

    def get_link(self, operator: BaseOperator, *, ti_key: Any) -> str:
        return XCom.get_value(ti_key=ti_key, key=REPORT_URL_KEY) or ""


class TrainingReportOperator(BaseOperator):
    """
    Render the report (plots, gates, params, resources) and upload it to the artifacts bucket.

    :param spec: the run spec from ``validate_params``
    :param metrics: the summary from ``collect_metrics``
    :param preflight: the preflight gate's result, if preflight ran
    :param run_resources: ids of what the run created, shown in the report
    """

    template_fields: Sequence[str] = ("spec", "metrics", "preflight", "run_resources")
    operator_extra_links = (TrainingReportLink(),)

    def __init__(
        self,
        *,
        spec: Any,
        metrics: Any,
        preflight: Any = None,
        run_resources: Any = None,
        aws_conn_id: str = "aws_default",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.metrics = metrics
        self.preflight = preflight
        self.run_resources = run_resources
        self.aws_conn_id = aws_conn_id

    def execute(self, context: Any) -> dict[str, str]:
        if not self.metrics:
            raise AirflowSkipException("no metrics were collected (training did not finish): no report")
        report = publish_report(self.spec, self.metrics, self.preflight, self.run_resources or {}, self.aws_conn_id)
        context["ti"].xcom_push(key=REPORT_URL_KEY, value=report["url"])
        return report
