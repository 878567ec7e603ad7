// Forms of the dashboard: a budget form shows the one target field its scope needs.
(function () {
  "use strict";
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("select[data-scope-select]").forEach(function (select) {
      const fields = select.form.querySelectorAll("[data-scope-field]");
      function sync() {
        fields.forEach(function (el) { el.hidden = el.dataset.scopeField !== select.value; });
      }
      select.addEventListener("change", sync);
      sync();
    });
  });
})();
