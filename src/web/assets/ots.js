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

  // Parts of a page that refresh themselves (lab, queue).
  document.querySelectorAll('[data-refresh]').forEach(function (el) {
    var every = parseInt(el.dataset.every, 10) || 5000;
    setInterval(function () {
      fetch(el.dataset.refresh, { credentials: 'same-origin' }).then(function (r) {
        if (r.status === 401) { location.reload(); return null; }
        return r.ok ? r.text() : null;
      }).then(function (html) { if (html !== null) el.innerHTML = html; }).catch(function () {});
    }, every);
  });

  // A task's log: earlier lines on scroll, new lines pushed as they come.
  var log = document.getElementById('log');
  if (log) {
    var task = log.dataset.task;
    var start = parseInt(log.dataset.start, 10);
    var end = parseInt(log.dataset.end, 10);
    var filter = document.getElementById('filter');
    var status = document.getElementById('live-status');
    var needle = filter ? filter.value : '';
    var setStatus = function (s) { if (status) status.textContent = s; };
    var show = function (div) { div.hidden = needle !== '' && div.textContent.indexOf(needle) < 0; };
    var render = function (text) {
      var frag = document.createDocumentFragment();
      var lines = text.split('\n');
      lines.pop(); // the text ends with a newline
      lines.forEach(function (line) {
        var d = document.createElement('div');
        d.className = lineClass(line);
        d.textContent = visible(line);
        show(d);
        frag.appendChild(d);
      });
      return frag;
    };
    if (filter) {
      filter.addEventListener('input', function () {
        needle = filter.value;
        Array.prototype.forEach.call(log.children, show);
      });
    }
    var loading = false;
    var earlier = function () {
      if (loading || start <= 0) return;
      loading = true;
      fetch('/api/tasks/' + encodeURIComponent(task) + '/log?before=' + start, { credentials: 'same-origin' })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (j) {
          loading = false;
          if (!j || j.end !== start) return;
          var height = document.documentElement.scrollHeight;
          log.insertBefore(render(j.text), log.firstChild);
          start = j.start;
          window.scrollBy(0, document.documentElement.scrollHeight - height);
          if (start <= 0) { var a = document.getElementById('earlier'); if (a) a.remove(); }
        }).catch(function () { loading = false; });
    };
    var link = document.getElementById('earlier');
    if (link) link.addEventListener('click', function (e) { e.preventDefault(); earlier(); });
    window.addEventListener('scroll', function () { if (window.scrollY < 50) earlier(); });
    if (log.dataset.live === '1') {
      window.scrollTo(0, document.documentElement.scrollHeight);
      var es = new EventSource('/api/tasks/' + encodeURIComponent(task) + '/log/stream?from=' + end);
      setStatus('live');
      es.addEventListener('lines', function (e) {
        var m = JSON.parse(e.data);
        if (m.to <= end) return; // already shown
        var bottom = window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 40;
        log.appendChild(render(m.text));
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
    } else {
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
        .then(function (html) { if (html !== null) run.innerHTML = html; })
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
    b.addEventListener('click', function (e) { if (!window.confirm(b.dataset.confirm)) e.preventDefault(); });
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
