-- A contact's enrollments (the console's contact page) read by an index, not a scan.
CREATE INDEX enrollments_view_contact ON enrollments_view (contact_id, enrolled_at DESC, id DESC);
