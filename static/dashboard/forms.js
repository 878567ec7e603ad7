// Forms of the dashboard: a budget form shows the one target field its scope needs; a
// provider-key form shows the fields its provider uses (data-provider-fields lists them).
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
    document.querySelectorAll("select[data-provider-select]").forEach(function (select) {
      const fields = select.form.querySelectorAll("[data-provider-fields]");
      function sync() {
        fields.forEach(function (el) {
          el.hidden = el.dataset.providerFields.split(" ").indexOf(select.value) < 0;
        });
      }
      select.addEventListener("change", sync);
      sync();
    });
  });
})();
