(function(){
  var table=document.getElementById('neurons'), tbody=table.tBodies[0];
  var rows=Array.prototype.slice.call(tbody.rows);
  var layer=document.getElementById('f-layer'), lo=document.getElementById('f-min'), hi=document.getElementById('f-max');
  var q=document.getElementById('f-text'), tq=document.getElementById('f-token'), count=document.getElementById('count');
  rows.forEach(function(r){ r._tokens=JSON.parse(r.dataset.tokens); });
  function apply(){
    var L=layer.value, mn=parseFloat(lo.value), mx=parseFloat(hi.value);
    var text=q.value.trim().toLowerCase(), tok=tq.value.trim().toLowerCase(), shown=0;
    rows.forEach(function(r){
      var s=r.dataset.score===''?NaN:parseFloat(r.dataset.score);
      var ok=(L==='all'||r.dataset.layer===L)
        &&(isNaN(mn)||(!isNaN(s)&&s>=mn))&&(isNaN(mx)||(!isNaN(s)&&s<=mx))
        &&(!text||r.dataset.expl.indexOf(text)>=0)
        &&(!tok||r._tokens.some(function(t){return t.indexOf(tok)>=0;}));
      r.hidden=!ok; if(ok) shown++;
    });
    count.textContent=shown+' of '+rows.length+' neurons';
  }
  [layer,lo,hi,q,tq].forEach(function(el){ el.addEventListener('input',apply); el.addEventListener('change',apply); });
  var current=null, dir=1;
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th){
    if(!th.dataset.key) return;
    th.classList.add('sortable');
    th.addEventListener('click',function(){
      var key=th.dataset.key, num=th.dataset.type==='num';
      dir=(current===th)?-dir:(num?-1:1); current=th;
      Array.prototype.forEach.call(table.tHead.rows[0].cells,function(c){c.classList.remove('sorted-asc','sorted-desc');});
      th.classList.add(dir>0?'sorted-asc':'sorted-desc');
      rows.sort(function(a,b){
        var x=a.dataset[key], y=b.dataset[key];
        if(num){ x=x===''?NaN:parseFloat(x); y=y===''?NaN:parseFloat(y);
          if(isNaN(x)&&isNaN(y)) return 0; if(isNaN(x)) return 1; if(isNaN(y)) return -1; return (x-y)*dir; }
        return x.localeCompare(y)*dir;
      });
      rows.forEach(function(r){tbody.appendChild(r);});
    });
  });
  apply();
})();
