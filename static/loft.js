// Keeps the active tab visible in the tab bar on narrow screens, where the bar scrolls sideways.
function loftShowActiveTab() {
  var active = document.querySelector(".tab.active");
  if (active) active.scrollIntoView({ block: "nearest", inline: "nearest" });
}
document.addEventListener("htmx:afterSettle", loftShowActiveTab);
window.addEventListener("load", loftShowActiveTab);
window.addEventListener("resize", loftShowActiveTab);

// Datasets: files dropped on the upload box are sent as if chosen with its file picker.
document.addEventListener("dragover", function (e) {
  var zone = e.target.closest && e.target.closest(".dropzone");
  if (zone) { e.preventDefault(); zone.classList.add("over"); }
});
document.addEventListener("dragleave", function (e) {
  var zone = e.target.closest && e.target.closest(".dropzone");
  if (zone) zone.classList.remove("over");
});
document.addEventListener("drop", function (e) {
  var zone = e.target.closest && e.target.closest(".dropzone");
  if (!zone) return;
  e.preventDefault();
  zone.classList.remove("over");
  var input = zone.querySelector("input[type=file]");
  input.files = e.dataTransfer.files;
  htmx.trigger(zone, "submit");
});
