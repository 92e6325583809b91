"""`linewatch console`: the operator's web console (issue 18).

One aiohttp app on one port (``app.py``) with live updates by server-sent events and plain HTML/CSS/JS
(``static/``, no front-end build step). It tails, without a consumer group, the results, defect events,
drift alerts, DLQ, serving state, model events, feedback and (for thumbnails) frames topics
(``sources.py``) into bounded ring buffers (``state.py``). Pages: camera wall, defect gallery + detail,
drift alerts, models (serving versions, rollout history, thresholds + the feedback's proposal),
throughput/latency and DLQ by reason. Reads are open; the one action (confirm / false-alarm feedback on a
defect, ``feedback.py``) needs ``Authorization: Bearer <console_token>`` (``auth.py``).
"""
