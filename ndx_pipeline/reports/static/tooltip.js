(function(){
  var tip=document.getElementById('tip');
  function show(e){
    var el=e.target.closest('.t'); if(!el){tip.style.display='none';return;}
    var lines=['token  '+JSON.stringify(el.textContent.replace(/\u21B5\n$/,'\n'))];
    if(el.dataset.a!==undefined) lines.push('activation  '+el.dataset.a);
    if(el.dataset.s!==undefined) lines.push('simulated   '+el.dataset.s+' / 10');
    if(el.dataset.a!==undefined && el.dataset.m) lines.push('of max      '+el.dataset.m);
    tip.textContent=lines.join('\n'); tip.style.display='block';
    var x=e.clientX+14, y=e.clientY+14, r=tip.getBoundingClientRect();
    if(x+r.width>innerWidth-8) x=e.clientX-r.width-14;
    if(y+r.height>innerHeight-8) y=e.clientY-r.height-14;
    tip.style.left=x+'px'; tip.style.top=y+'px';
  }
  document.addEventListener('mouseover',show);
  document.addEventListener('mousemove',function(e){ if(tip.style.display==='block') show(e); });
  document.addEventListener('mouseleave',function(){tip.style.display='none';});
  var lj=document.getElementById('lineage-json'), out=document.getElementById('lineage-json-view');
  if(lj && out){
    var d=out.closest('details');
    d.addEventListener('toggle',function(){ if(d.open && !out.textContent){
      out.textContent=JSON.stringify(JSON.parse(lj.textContent),null,2);} });
  }
})();
