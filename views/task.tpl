% rebase("layout.tpl", title=title)
% task = view.task
<p><a href="{{root}}">All tasks</a></p>
<h1>Task <code>{{task.id}}</code></h1>
<section class="card">
<dl>
  <dt>command</dt><dd><pre class="command">{{task.command}}</pre></dd>
  <dt>state</dt><dd class="state-{{task.state}}">{{task.state}}</dd>
  <dt>schedule</dt><dd class="schedule">{{view.words}}</dd>
  <dt>frequency</dt><dd><code>{{task.frequency}}</code> in {{task.timezone}}</dd>
  <dt>options</dt><dd>catch-up {{"%g s" % task.catchup}}, overlap {{task.overlap}}, jitter {{"%g s" % task.jitter}}, timeout {{"%g s" % task.timeout if task.timeout is not None else "until the next slot, at most 1 h"}}</dd>
  <dt>next runs</dt>
  <dd>
  % for utc_text, local_text in view.next_fire_times:
  {{local_text}} ({{utc_text}})<br>
  % end
  % if not view.next_fire_times:
  none
  % end
  </dd>
</dl>
</section>
<h2>Latest complete run</h2>
% if view.execution is None:
<p class="empty">No complete run yet.</p>
% else:
<p class="meta">slot {{time_text(view.execution.scheduled_for)}}, complete because {{"every expected agent reported" if view.execution.complete_reason == "all_reported" else "its deadline passed"}}</p>
% for run in view.runs:
<section class="card run" data-agent="{{run.agent_id}}">
  <h3><span class="host {{run.css_class}}">{{run.agent_id}}: {{run.status}}</span></h3>
  % result = run.result
  % if result is None:
  <p class="meta">This agent was expected and has not reported this slot.</p>
  % else:
  <p class="meta">exit code {{result.exit_code if result.exit_code is not None else "none"}}, started {{time_text(result.started_at) or "-"}}, finished {{time_text(result.finished_at)}} ({{run.age}} ago){{", late" if result.late else ""}}</p>
  % if result.reason:
  <p class="meta">reason: {{result.reason}}</p>
  % end
  % for name in ("stdout", "stderr"):
  % text, cut = shown_output(getattr(result, name))
  % if text:
  <p class="meta">{{name}}{{" (the first %d characters; the API returns all of it)" % len(text) if cut else ""}}{{", truncated by the agent" if result.truncated else ""}}</p>
  <pre class="{{name}}">{{text}}</pre>
  % end
  % end
  % end
</section>
% end
% end
