// coreupdate dashboard: the pages work without this file. It (1) refreshes the parts of a page marked
// data-live every data-refresh seconds by fetching the same page and swapping those elements (not while the
// page is hidden, nor an element holding the keyboard focus), (2) shows times in the viewer's zone, keeping
// UTC in the title, and (3) shows chart tooltips on hover and focus.
"use strict";
(function () {
  var timeFormat = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit",
    timeZoneName: "short"
  });

  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      var when = new Date(el.getAttribute("datetime"));
      if (isNaN(when.getTime())) { return; }
      el.textContent = timeFormat.format(when);
    });
  }

  var tip = null;
  function showTip(event) {
    var target = event.target.closest ? event.target.closest("[data-tip]") : null;
    if (!tip) { return; }
    if (!target) { tip.hidden = true; return; }
    tip.textContent = target.getAttribute("data-tip");
    tip.hidden = false;
    var box = target.getBoundingClientRect();
    tip.style.left = Math.max(4, window.scrollX + box.left) + "px";
    tip.style.top = (window.scrollY + box.top - tip.offsetHeight - 6) + "px";
  }

  function refresh() {
    if (document.hidden) { return; }
    fetch(window.location.href, { credentials: "same-origin", headers: { "X-Live-Refresh": "1" } })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (!html) { return; }
        var fresh = new DOMParser().parseFromString(html, "text/html");
        document.querySelectorAll("[data-live]").forEach(function (el) {
          var next = fresh.getElementById(el.id);
          if (!next || el.contains(document.activeElement)) { return; }
          el.replaceWith(next);
          localTimes(next);
        });
      })
      .catch(function () { /* the next round tries again */ });
  }

  document.addEventListener("DOMContentLoaded", function () {
    localTimes(document);
    tip = document.getElementById("tip");
    document.addEventListener("mouseover", showTip);
    document.addEventListener("focusin", showTip);
    var seconds = parseInt(document.body.getAttribute("data-refresh") || "0", 10);
    if (seconds > 0) { window.setInterval(refresh, seconds * 1000); }
  });
})();
