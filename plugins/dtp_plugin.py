"""Registers DTP's operator extra links and its fault-injection listener with Airflow
(plugins/ is on Airflow's plugin path)."""

from airflow.plugins_manager import AirflowPlugin

from dtp.faults import FaultInjectionListener
from dtp.operators.report import TrainingReportLink, ValidationReportLink


class DtpPlugin(AirflowPlugin):
    """The report links on the report tasks, and the fault-injection listener."""

    name = "dtp"
    operator_extra_links = [TrainingReportLink(), ValidationReportLink()]
    # Inert unless DTP_FAULT_PLAN names an existing plan file (see dtp.faults).
    listeners = [FaultInjectionListener()]
