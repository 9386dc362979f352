"""Registers DTP's operator extra links with Airflow (plugins/ is on Airflow's plugin path)."""

from airflow.plugins_manager import AirflowPlugin

from dtp.operators.report import TrainingReportLink, ValidationReportLink


class DtpPlugin(AirflowPlugin):
    name = "dtp"
    operator_extra_links = [TrainingReportLink(), ValidationReportLink()]
