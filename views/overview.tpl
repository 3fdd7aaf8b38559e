% rebase("layout.tpl", title=title)
<h1>Overview</h1>
<h2>Tasks ({{len(tasks)}})</h2>
% if not tasks:
<p class="empty">No tasks yet. Create one with POST /api/v1/tasks/create.</p>
% end
% for view in tasks:
<section class="card task" id="task-{{view.task.id}}">
  <h3><a href="{{root}}tasks/{{view.task.id}}"><code class="command">{{view.task.command}}</code></a></h3>
  <p class="schedule">{{view.words}}</p>
  % if view.task.state != "active":
  <p class="meta state-{{view.task.state}}">paused: no runs until it is resumed</p>
  % end
  % if view.next_fire_times:
  <p class="meta">next run {{view.next_fire_times[0][1]}}, in {{view.next_in}}</p>
  % end
  % if view.execution is None:
  <p class="meta">no complete run yet</p>
  % else:
  <p class="meta">latest complete run: slot {{view.execution.scheduled_for.strftime("%Y-%m-%d %H:%M:%S")}} UTC</p>
  <ul class="hosts">
    % for run in view.runs:
    <li class="host {{run.css_class}}" data-agent="{{run.agent_id}}" data-status="{{run.status}}">
      <span class="agent">{{run.agent_id}}</span>
      <span class="status">{{run.status}}</span>
      % if run.exit_code is not None:
      <span class="exit-code">exit {{run.exit_code}}</span>
      % end
      % if run.age:
      <span class="age">{{run.age}} ago</span>
      % end
    </li>
    % end
  </ul>
  % end
</section>
% end
<h2>Agents ({{len(agents)}})</h2>
% if not agents:
<p class="empty">No agent has registered yet.</p>
% else:
<div class="table-wrap">
<table class="agents">
<thead><tr><th>agent</th><th>state</th><th>last seen</th><th>host</th><th>platform</th><th>version</th><th>outbox</th></tr></thead>
<tbody>
% for view in agents:
<tr data-agent="{{view.agent.id}}">
  <td>{{view.agent.id}}</td>
  <td class="{{"state-online" if view.online else "state-offline"}}">{{"online" if view.online else "offline"}}</td>
  <td>{{view.last_seen}} ago</td>
  <td>{{view.agent.hostname}}</td>
  <td>{{view.agent.platform}}</td>
  <td>{{view.agent.version}}</td>
  <td>{{view.agent.outbox_depth}}{{" (%d dropped)" % view.agent.outbox_dropped if view.agent.outbox_dropped else ""}}</td>
</tr>
% end
</tbody>
</table>
</div>
% end
