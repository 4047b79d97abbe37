// ots dashboard: live updates on top of pages that work without it.
// Plain JavaScript, no build step. Everything shown is set as text.
'use strict';
(function () {
  // Control characters (but tab) and bidirectional controls shown as
  // \xNN or \u{N}, as the server renders them.
  function visible(s) {
    return s.replace(/[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g, function (c) {
      var n = c.charCodeAt(0);
      return n < 0x80 ? '\\x' + n.toString(16).padStart(2, '0') : '\\u{' + n.toString(16) + '}';
    });
  }
  function lineClass(line) {
    if (line.startsWith('[serial] ')) return 'l serial';
    if (line.startsWith('[stderr] ')) return 'l stderr';
    if (line.startsWith('[ots-worker] ')) return 'l worker';
    return 'l';
  }

  // Tables shown as cards on a phone: each cell named by its column.
  var label = function (root) {
    root.querySelectorAll('table.cards').forEach(function (t) {
      var names = Array.prototype.map.call(t.querySelectorAll('thead th'), function (th) { return th.textContent; });
      t.querySelectorAll('tbody tr').forEach(function (tr) {
        Array.prototype.forEach.call(tr.children, function (td, i) {
          if (names[i] && !td.dataset.label) td.dataset.label = names[i];
        });
      });
    });
  };
  label(document);

  // Parts of a page that refresh themselves (lab, queue).
  document.querySelectorAll('[data-refresh]').forEach(function (el) {
    var every = parseInt(el.dataset.every, 10) || 5000;
    setInterval(function () {
      fetch(el.dataset.refresh, { credentials: 'same-origin' }).then(function (r) {
        if (r.status === 401) { location.reload(); return null; }
        return r.ok ? r.text() : null;
      }).then(function (html) { if (html !== null) { el.innerHTML = html; label(el); } }).catch(function () {});
    }, every);
  });

  // A task's log: the server renders a window of it (numbered, coloured,
  // folded); here only a #L permalink outside the window is opened on the
  // server, the line asked for is scrolled to, and a running task's new
  // lines are appended (at most MAX_LINES kept on the page).
  var log = document.getElementById('log');
  if (log) {
    var task = log.dataset.task;
    var end = parseInt(log.dataset.end, 10);
    var next = parseInt(log.dataset.nextLine, 10);
    var MAX_LINES = 20000;
    var status = document.getElementById('live-status');
    var setStatus = function (s) { if (status) status.textContent = s; };
    var hash = /^#L(\d+)$/.exec(location.hash);
    if (hash && !document.getElementById('L' + hash[1])) {
      location.replace(location.pathname + '?line=' + hash[1] + '#L' + hash[1]);
      return;
    }
    var here = document.querySelector('#log .here');
    // SGR colours as the server draws them; other sequences stay visible.
    var sgr = function (style, params) {
      var ps = params === '' ? [0] : params.split(';').map(function (p) { return parseInt(p, 10) || 0; });
      for (var i = 0; i < ps.length; i++) {
        var p = ps[i];
        if (p === 0) style = {};
        else if (p === 1) style.bold = true;
        else if (p === 22) style.bold = false;
        else if (p >= 30 && p <= 37) style.fg = p - 30;
        else if (p >= 90 && p <= 97) style.fg = p - 82;
        else if (p === 39) delete style.fg;
        else if (p >= 40 && p <= 47) style.bg = p - 40;
        else if (p >= 100 && p <= 107) style.bg = p - 92;
        else if (p === 49) delete style.bg;
        else if (p === 38 || p === 48) { i += ps[i + 1] === 5 ? 2 : (ps[i + 1] === 2 ? 4 : 1); }
      }
      return style;
    };
    var liveStyle = {};
    var colour = function (target, text) {
      var re = /\x1b\[([0-9;]{0,64})m/g, last = 0, m;
      var put = function (t) {
        if (t === '') return;
        var cls = [];
        if (liveStyle.fg !== undefined) cls.push('a-f' + liveStyle.fg);
        if (liveStyle.bg !== undefined) cls.push('a-b' + liveStyle.bg);
        if (liveStyle.bold) cls.push('a-bold');
        if (cls.length) { var s = document.createElement('span'); s.className = cls.join(' '); s.textContent = visible(t); target.appendChild(s); }
        else target.appendChild(document.createTextNode(visible(t)));
      };
      while ((m = re.exec(text)) !== null) {
        put(text.substring(last, m.index));
        liveStyle = sgr(Object.assign({}, liveStyle), m[1]);
        last = re.lastIndex;
      }
      put(text.substring(last));
    };
    var two = function (n) { return (n < 10 ? '0' : '') + n; };
    var render = function (text) {
      var frag = document.createDocumentFragment();
      var lines = text.split('\n');
      lines.pop(); // the text ends with a newline
      var now = new Date();
      var t = two(now.getUTCHours()) + ':' + two(now.getUTCMinutes()) + ':' + two(now.getUTCSeconds());
      lines.forEach(function (line) {
        var d = document.createElement('div');
        d.className = lineClass(line);
        d.id = 'L' + next;
        var a = document.createElement('a');
        a.className = 'n';
        a.href = '?line=' + next + '#L' + next;
        a.textContent = String(next);
        var ts = document.createElement('span');
        ts.className = 't';
        ts.textContent = t;
        var x = document.createElement('span');
        x.className = 'x';
        colour(x, line);
        d.appendChild(a); d.appendChild(ts); d.appendChild(x);
        frag.appendChild(d);
        next += 1;
      });
      return frag;
    };
    if (here && !hash) here.scrollIntoView({ block: 'center' });
    if (log.dataset.live === '1') {
      if (!hash) window.scrollTo(0, document.documentElement.scrollHeight);
      var es = new EventSource('/api/tasks/' + encodeURIComponent(task) + '/log/stream?from=' + end);
      setStatus('live');
      es.addEventListener('lines', function (e) {
        var m = JSON.parse(e.data);
        if (m.to <= end) return; // already shown
        var bottom = window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 40;
        log.appendChild(render(m.text));
        while (log.children.length > MAX_LINES) log.removeChild(log.firstChild);
        end = m.to;
        log.dataset.end = String(end);
        if (bottom) window.scrollTo(0, document.documentElement.scrollHeight);
        setStatus('live');
      });
      es.addEventListener('end', function () { es.close(); setStatus('task ended'); });
      es.addEventListener('signed_out', function () { es.close(); setStatus('signed out'); });
      es.onerror = function () {
        setStatus(es.readyState === EventSource.CLOSED ? 'disconnected: reload the page' : 'reconnecting…');
      };
    } else if (!hash && !here && !/[?&](after|before|line)=/.test(location.search)) {
      window.scrollTo(0, document.documentElement.scrollHeight);
    }
  }

  // A testrun's progress: the tasks table is fetched again on each event.
  var run = document.getElementById('run');
  if (run && run.dataset.live === '1') {
    var id = run.dataset.run;
    var pending = null;
    var refresh = function () {
      pending = null;
      fetch('/runs/' + encodeURIComponent(id) + '?fragment=1', { credentials: 'same-origin' })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) { if (html !== null) { run.innerHTML = html; label(run); } })
        .catch(function () {});
    };
    var soon = function () { if (!pending) pending = setTimeout(refresh, 150); };
    var rs = new EventSource('/api/runs/' + encodeURIComponent(id) + '/stream?from=0');
    rs.addEventListener('progress', soon);
    rs.addEventListener('end', function () { rs.close(); refresh(); });
    rs.addEventListener('signed_out', function () { rs.close(); });
  }

  // Buttons that end something ask first.
  document.querySelectorAll('button[data-confirm]').forEach(function (b) {
    if (!b.dataset.confirm) return;
    b.addEventListener('click', function (e) {
      if (!window.confirm(b.dataset.confirm)) { e.preventDefault(); return; }
      // Asked here: the server need not ask again.
      var c = b.form && b.form.querySelector('input[name=confirm]');
      if (c) c.value = 'yes';
    });
  });

  // A lease's console input: one stream per page, each line sent at the
  // stream's offset; an unanswered or refused send is sent again from
  // what the server says it has, so nothing is typed twice or lost.
  var input = document.getElementById('console-input');
  if (input) {
    var lease = input.dataset.lease;
    var stream = input.querySelector('[name=stream]').value;
    var csrf = input.querySelector('[name=csrf]').value;
    var have = 0, pending = '', busy = false;
    var text = input.querySelector('[name=text]');
    var eol = input.querySelector('[name=eol]');
    var pump = function () {
      if (busy || pending === '') return;
      busy = true;
      var piece = pending;
      fetch('/api/leases/' + encodeURIComponent(lease) + '/input', {
        method: 'POST', credentials: 'same-origin',
        headers: { 'content-type': 'application/json', 'x-csrf-token': csrf },
        body: JSON.stringify({ stream: stream, offset: have, text: piece })
      }).then(function (r) { return r.ok ? r.json() : null; }).then(function (j) {
        busy = false;
        if (j && typeof j.have === 'number') {
          // The server has the stream up to `have` (bytes): drop what it took.
          var bytes = new TextEncoder().encode(piece);
          var took = Math.min(j.have - have, bytes.length);
          have = j.have;
          pending = pending.substring(new TextDecoder().decode(bytes.slice(0, took)).length);
          if (took > 0) pump(); else setTimeout(pump, 500);
        } else {
          setTimeout(pump, 500);
        }
      }).catch(function () { busy = false; setTimeout(pump, 500); });
    };
    // An open console page keeps its holder heard (the lease's idle limit).
    setInterval(function () {
      fetch('/api/leases/' + encodeURIComponent(lease) + '/keep', {
        method: 'POST', credentials: 'same-origin', headers: { 'x-csrf-token': csrf }
      }).catch(function () {});
    }, 60000);
    input.addEventListener('submit', function (e) {
      e.preventDefault();
      var end = eol.value === 'cr' ? '\r' : (eol.value === 'none' ? '' : '\n');
      pending += text.value + end;
      text.value = '';
      pump();
    });
  }
})();
