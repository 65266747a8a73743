"""The store: every SQL statement on flows, attempts, the outbox and the definitions.

One seam between flowd and its database (SQLite or PostgreSQL): the engine, api, cli,
reaper, service and outbox call these named operations and get ``Row`` objects back;
none of them writes SQL or peewee queries of its own. peewee stays for the schema,
migrations and the catalog (``models.py``, ``migrations.py``, ``catalog.py``).
"""

from flowd.store.definitions import Definitions, RoutineInfo, TaskInfo
from flowd.store.flows import (
    active_flows,
    count_active,
    done_outputs,
    end_running_results,
    finish_held_result,
    flow_and_result,
    flow_by_request_id,
    flows_by_id,
    get_flow,
    has_pending,
    insert_flow,
    insert_result,
    pending_flows,
    running_result,
    select_flows,
    step_output,
    update_flow,
    update_result,
)
from flowd.store.outbox import add_outbox
from flowd.store.rows import FLOW_COLUMNS, RESULT_COLUMNS, Row, decode, encode, execute, sql_bool

__all__ = [
    "FLOW_COLUMNS",
    "RESULT_COLUMNS",
    "Definitions",
    "RoutineInfo",
    "Row",
    "TaskInfo",
    "active_flows",
    "add_outbox",
    "count_active",
    "decode",
    "done_outputs",
    "encode",
    "end_running_results",
    "execute",
    "finish_held_result",
    "flow_and_result",
    "flow_by_request_id",
    "flows_by_id",
    "get_flow",
    "has_pending",
    "insert_flow",
    "insert_result",
    "pending_flows",
    "running_result",
    "select_flows",
    "sql_bool",
    "step_output",
    "update_flow",
    "update_result",
]
