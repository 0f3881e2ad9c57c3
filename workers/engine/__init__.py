"""The workflow engine: BPMN parsing and (with the workflow issue) stepping."""
