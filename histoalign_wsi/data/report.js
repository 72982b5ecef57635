(function(){
var D = JSON.parse(document.getElementById('report-data').textContent);
var C = D.classes, COL = D.colors, R = D.rows;
var S = {sort: 'slide', asc: true, q: '', page: 1, size: D.page_size, sel: null};
var KEYS = {slide: 0, label: 1, predicted: 2, status: 4, tiles: 5, probability: 6, regions: 7};
function params(){
  var h = new URLSearchParams(location.hash.slice(1));
  if (h.get('sort') in KEYS) S.sort = h.get('sort');
  if (h.has('asc')) S.asc = h.get('asc') !== '0';
  if (h.has('q')) S.q = h.get('q');
  if (h.has('page')) S.page = Math.max(1, parseInt(h.get('page')) || 1);
  if (h.has('size')) S.size = Math.max(1, parseInt(h.get('size')) || D.page_size);
}
function top(r){ var p = r[5]; if (!p) return -1; return Math.max.apply(null, p); }
function area(r){ var a = r[6] || {}, s = 0; for (var k in a) s += a[k]; return s; }
function key(r){
  switch (S.sort) {
    case 'slide': return r[0]; case 'label': return r[1]; case 'predicted': return r[2];
    case 'status': return r[3]; case 'tiles': return r[4]; case 'probability': return top(r);
    case 'regions': return area(r);
  }
}
function cmp(a, b){
  var x = key(a), y = key(b), c;
  if (typeof x === 'number' && typeof y === 'number') c = x - y;
  else c = String(x).localeCompare(String(y), undefined, {numeric: true});
  return S.asc ? c : -c;
}
function visible(){
  var q = S.q.toLowerCase();
  var rows = q ? R.filter(function(r){
    return (r[0] + '\t' + r[1] + '\t' + r[2] + '\t' + r[3]).toLowerCase().indexOf(q) >= 0;
  }) : R.slice();
  return rows.sort(cmp);
}
function el(tag, text, cls){
  var e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
function bars(p){
  var td = el('td', null, 'probs');
  if (!p) return td;
  var order = p.map(function(v, i){ return [v, i]; }).sort(function(a, b){ return b[0] - a[0]; });
  order.forEach(function(o){
    var d = el('div', null, 'bar'), f = el('span', null, 'fill');
    f.style.width = Math.max(1, Math.round(80 * o[0])) + 'px';
    f.style.background = 'rgb(' + COL[o[1]].join(',') + ')';
    d.appendChild(f); d.appendChild(el('span', C[o[1]] + ' ' + o[0].toFixed(2), 'lab'));
    td.appendChild(d);
  });
  return td;
}
function regions(a){
  var td = el('td');
  Object.keys(a || {}).sort(function(x, y){ return a[y] - a[x]; }).forEach(function(k){
    td.appendChild(el('div', k + ' ' + a[k].toFixed(2)));
  });
  return td;
}
function thumb(r){
  var td = el('td'), im = r[7] || {};
  if (!im.thumb) return td;
  var a = el('a'); a.href = im.argmax || im.thumb; a.target = '_blank';
  var i = el('img', null, 'thumb'); i.loading = 'lazy'; i.src = im.thumb; i.alt = r[0];
  a.appendChild(i); td.appendChild(a);
  return td;
}
function detail(r){
  S.sel = r[0];
  var box = document.getElementById('detail'), im = r[7] || {};
  box.hidden = false;
  document.getElementById('detail-title').textContent = r[0];
  document.getElementById('detail-pred').textContent = r[2];
  var a = document.getElementById('detail-argmax'), p = document.getElementById('detail-class');
  a.src = im.argmax || ''; a.alt = r[0] + ': argmax';
  p.src = im.predicted || ''; p.alt = r[0] + ': P(' + r[2] + ')';
  document.getElementById('fig-class').hidden = !im.predicted;
  var t = document.getElementById('detail-attention');
  t.src = im.attention || ''; t.alt = r[0] + ': attention';
  document.getElementById('fig-attention').hidden = !im.attention;
  document.getElementById('detail-cls').textContent = r[2];
  document.querySelectorAll('#slides tbody tr').forEach(function(tr){
    tr.classList.toggle('sel', tr.dataset.id === r[0]);
  });
}
function render(){
  var rows = visible(), n = rows.length, pages = Math.max(1, Math.ceil(n / S.size));
  S.page = Math.min(S.page, pages);
  var tb = document.querySelector('#slides tbody'); tb.textContent = '';
  rows.slice((S.page - 1) * S.size, S.page * S.size).forEach(function(r){
    var tr = el('tr'); tr.dataset.id = r[0];
    tr.appendChild(thumb(r)); tr.appendChild(el('td', r[0])); tr.appendChild(el('td', r[1]));
    tr.appendChild(el('td', r[2])); tr.appendChild(bars(r[5])); tr.appendChild(el('td', r[3]));
    tr.appendChild(el('td', r[4] === null ? '' : String(r[4]))); tr.appendChild(regions(r[6]));
    (D.heads || []).forEach(function(h){
      var v = (r[8] || {})[h];
      tr.appendChild(el('td', v ? v[0] + (v[1] === null ? '' : ' (' + v[1].toFixed(2) + ')') : ''));
    });
    tr.addEventListener('click', function(ev){ if (ev.target.tagName !== 'IMG') detail(r); });
    tb.appendChild(tr);
  });
  document.getElementById('count').textContent =
    n + ' of ' + R.length + ' slides; page ' + S.page + ' of ' + pages;
  document.getElementById('q').value = S.q;
  var h = 'sort=' + S.sort + '&asc=' + (S.asc ? 1 : 0) + '&page=' + S.page +
    (S.q ? '&q=' + encodeURIComponent(S.q) : '') + (S.size !== D.page_size ? '&size=' + S.size : '');
  if (location.hash.slice(1) !== h) history.replaceState(null, '', '#' + h);
  var first = rows[(S.page - 1) * S.size];
  if (first && !rows.some(function(r){ return r[0] === S.sel; })) detail(first);
  else if (first) detail(rows.filter(function(r){ return r[0] === S.sel; })[0]);
  document.body.dataset.ready = '1';
}
document.querySelectorAll('#slides th[data-key]').forEach(function(th){
  th.classList.add('sort');
  th.addEventListener('click', function(){
    var k = th.dataset.key; S.asc = S.sort === k ? !S.asc : true; S.sort = k; S.page = 1; render();
  });
});
document.getElementById('q').addEventListener('input', function(e){
  S.q = e.target.value; S.page = 1; render();
});
document.getElementById('prev').addEventListener('click', function(){
  S.page = Math.max(1, S.page - 1); render();
});
document.getElementById('next').addEventListener('click', function(){ S.page += 1; render(); });
window.addEventListener('hashchange', function(){ params(); render(); });
params(); render();
})();
