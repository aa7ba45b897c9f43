"""The agent loop: ``protocol`` (the message format), ``schemas`` (tool schemas and prompts),
``episode`` (an episode's task, state and result), ``policy`` (what a policy is),
``environment`` (the one loop) and ``runner`` (many episodes through one engine)."""
