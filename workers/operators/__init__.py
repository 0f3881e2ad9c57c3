"""Service-task operators: the side effects a workflow may have, by name.

A BPMN service task names an operator and its parameters (SpiffArena's
`spiffworkflow:serviceTaskOperator`); the parameters are expressions evaluated
against the execution's variables by the sandbox when the node is reached. The
operator then runs on the `actions` queue (`deliveries.run_action`) in a
transaction that also marks its `action_deliveries` row done, so an operator that
writes to the database takes effect exactly once. `send_webhook` leaves the
database: it sends the delivery key as `Idempotency-Key`, so a redelivery after a
crash between the response and the commit can be recognised by the receiver.

The engine knows BPMN, not users or webhooks: these modules sit beside it and call
ingest and the rules openly. `registry.OPERATORS` names every operator; `fleet apply`
refuses a BPMN whose service task names one that is not there.
"""
